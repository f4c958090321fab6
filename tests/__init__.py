"""The test suite; its folders mirror alignfl_app's subpackages."""
