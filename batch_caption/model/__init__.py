"""Show-and-Tell model core: vocabulary, encoder, decoder, beam search, bundle."""
