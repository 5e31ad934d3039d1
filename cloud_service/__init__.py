"""The cloud side of splitclip: a Ray Serve application (gRPC) that finishes the image tower and scores."""
