"""The objective of a micro-batch: CE + logit KD, chunked over the vocabulary by LM heads that never
make [B, T, vocab] logits, and the SHD attention term with the capture that brings each distilled
layer's q, k and squeeze weights to it."""
