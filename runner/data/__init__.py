"""Training data: dataset formats → Samples → Gemma4 micro-batches, sharded over data parallelism.

One concern per module: `sample` (the Sample type, BadSample), `sources` (MedPix-VQA and chat
formats), `synthetic` (`runner make-data`), `collate` (processor, chat template, label masking,
padding), `sampler` (seeded DP-sharded order), `loader` (workers, skip counts, resume).

How the trainer wires it, on every rank of DP replica `dp_rank`:

    source = load_sources([(spec, split), ...])
    collator = Gemma4Collator(processor, max_length=..., thinking_prefix=...)
    lengths = collator.estimate_lengths([source.text_and_images(i) for i in range(len(source))])  # grouping only
    sampler = StepSampler(len(source), micro_batch_size, grad_accum_steps, dp_size, dp_rank, seed, lengths=lengths)
    loader = MicroBatchLoader(source, collator, sampler, num_workers=..., on_bad="skip")
    loader.load_state_dict(saved)  # when resuming
    micro_batches = loader.next_step()  # or pass `loader` as DeepSpeed's data_iter
"""
