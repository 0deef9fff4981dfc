"""dtrguard: backs up a Docker Trusted Registry 1.4 node to S3 and restores it on a replacement."""

__version__ = "0.1.0"
