"""The built-in networks: the reference UNet family and the metric classifier."""
