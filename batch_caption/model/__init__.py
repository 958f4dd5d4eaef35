"""Captioning model core, each module importing only those before it:

    vocab           tokens and ids (no TensorFlow)
    registry        the encoders and decoders by name, and what each can do (no TensorFlow)
    config          ModelConfig, DecodeConfig, validated against the registry (no TensorFlow)
    encoder         the CNN backbone an encoder entry builds: uint8 images -> flat features
    show_and_tell   Show and Tell: pooled features -> LSTM decoder, teacher-forced or step by step
    attend_and_tell Show, Attend and Tell: grid features -> attention LSTM decoder, the same way
    network         the network a ModelConfig names (its decoder's entry builds it)
    beam_search     n-best search in the graph over a step callback
    captioner       Captioner: images -> n-best captions in one graph call
    bundle          a trained model's files: write, read, verify (no TensorFlow)
    load            a bundle -> the built model and its Captioner
"""
