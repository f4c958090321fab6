"""ServerApp and AlignFLStrategy: translate Flower messages into the core's store and global model."""
