"""The objective: CE + logit KD (chunked over the vocabulary) and the SHD attention term, with the capture that
brings each layer's attention maps to it."""
