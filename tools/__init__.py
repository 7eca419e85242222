"""Developer tools (not part of the qpass package): the ONNX backend-test sweep."""
