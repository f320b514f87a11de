"""speech-serve: an inference service for speech encoder-decoder models."""
