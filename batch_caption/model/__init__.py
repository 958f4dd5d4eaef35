"""Captioning model core, each module importing only those before it:

    vocab, config   tokens and ids; ModelConfig, DecodeConfig (no TensorFlow)
    encoder         the CNN backbone: uint8 images -> pooled features
    show_and_tell   Show and Tell: pooled features -> LSTM decoder, teacher-forced or step by step
    attend_and_tell Show, Attend and Tell: grid features -> attention LSTM decoder, the same way
    network         the network a ModelConfig names (its `decoder`)
    beam_search     n-best search in the graph over a step callback
    captioner       Captioner: images -> n-best captions in one graph call
    bundle          a trained model's files: write, read, verify (no TensorFlow)
    load            a bundle -> the built model and its Captioner
"""
