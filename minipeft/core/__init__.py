"""The lesson: a transformer with slots for PEFT methods, the methods themselves, the 4-bit quantizer and
the training loop. Nothing here imports the rest of minipeft.

    families.py        ModelConfig and FAMILIES: a family is a row of switches (Llama vs Gemma 2 in its docstring)
    model.py           Transformer: embeddings, attention, MLP, blocks, the heads and the loss
    positions.py       RoPE, positions with virtual tokens and a cache, attention masks
    registry.py        Method and Option (what a method declares), register, apply
    adapted.py         on any adapted model: trainable tensors, lr factors, task defaults, merge / unmerge
    targets.py         which linear layers a method adapts (q, k, v, o, up, down, gate, all) and wrap
    selective.py       full, head, last_k, bitfit: train a subset of the pretrained parameters
    lora.py            LoRA: low-rank updates; rsLoRA, PiSSA / OLoRA / gaussian init, LoRA+; FrozenLinear
    nf4.py, qlora.py   the NF4 / FP4 quantizer with double quantization; LoRA on a 4-bit base
    dora.py            DoRA: a learned magnitude per row, the direction updated by LoRA
    adapter.py         bottleneck adapters (Houlsby, Pfeiffer)
    prefix.py          prefix tuning: trainable keys/values in every layer
    prompt.py          prompt tuning: soft tokens prepended to the input
    llama_adapter.py   LLaMA-Adapter: gated adaption prompts in the top layers
    ia3.py             (IA)³: learned rescaling of keys, values and the FFN's inner activation
    vera.py            VeRA: frozen shared random low-rank matrices, trained scaling vectors
    loha.py, lokr.py   LyCORIS' LoHa (Hadamard product) and LoKr (Kronecker product) updates (delta.py)
    fingerprint.py     which base model an adapter belongs to
    data.py            datasets: collation, shuffling, length grouping, packing, label masks
    loop.py            AdamW groups, warmup + cosine, train_step with accumulation and clipping, evaluate
    generate.py        greedy and sampled generation with a KV cache (kv_cache.py)
"""
