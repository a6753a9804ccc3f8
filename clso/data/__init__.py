"""Text in, tokens out: corpora, tokenizers, token memmaps and the transfer step's labelled tasks."""
