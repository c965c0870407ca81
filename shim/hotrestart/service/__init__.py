"""The Task service: decode a request, call the container, encode the reply."""
