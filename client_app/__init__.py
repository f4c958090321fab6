"""ClientApp: translates Flower messages into calls on ``alignfl_app.silo.core.Silo``."""
