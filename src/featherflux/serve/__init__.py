"""HTTP services: the OpenAI-compatible image API (api, queue, auth, files) and the remote text encoder."""
