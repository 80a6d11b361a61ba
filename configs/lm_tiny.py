"""The default job: a tiny byte-level LM on Python's standard library, packed rows.

    python -m lcx.main --config configs/lm_tiny.py --workdir runs/lm_tiny
    python -m lcx.main --config configs/lm_tiny.py:smoke --workdir /tmp/smoke   # seconds

Trains 600 steps of 16 x 256 tokens to an eval loss of about 1.28 nats per byte in
about 8 minutes on a 2-core CPU (`make train`; BENCHMARKS.md has the timings).
"""

from ml_collections import config_dict

from lcx.runtime.sharding import DEFAULT_RULES


def get_config(arg=None):
    """`arg`: None for the full run, 'smoke' for a seconds-long CPU run."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/lm_tiny.py takes no argument or 'smoke'; got {arg!r}")
    smoke = arg == "smoke"
    c = config_dict.ConfigDict()
    c.mode = "train"  # train | eval | generate | evaluate | export | recipe | self_lengthen | serve
    c.seed = 0

    # --config.mode=generate: complete prompts with the workdir's latest checkpoint.
    c.generate = dict(
        prompts="def ",  # several separated by \\n
        prompts_file="",  # one prompt per line; overrides prompts
        max_new_tokens=200,
        temperature=0.0,  # 0: greedy
        top_k=0,  # 0: no limit
        top_p=1.0,  # 1: no limit
        seed=0,
        share_prefix=True,  # store the prompts' common prefix once (Hydragen)
        slots=0,  # sequences decoded at once; 0: all prompts
        token_budget=256,  # query tokens per engine step
    )

    # --config.mode=evaluate: long-context tasks (lcx.evals) at these prompt lengths in
    # tokens, scored by exact match of greedy generations and by the answer's likelihood,
    # and held-out loss by token position; appended to WORKDIR/evals.jsonl.
    c.evals = dict(
        tasks="kv_retrieval,multi_needle,variable_tracking,copy_span,icl_classification",
        lengths="1024,2048,4096",
        examples=20,  # per task and length
        seed=0,
        generate=True,  # False: likelihood scores only (faster)
        context=8192,  # the longest prompt + answer allowed; never truncated
        loss_by_position=True,
        position_length=4096,  # held-out documents scored up to this many tokens
        documents=64,
        # Length following (lcx.evals.length_following): `samples` sampled responses to
        # each writing instruction that names a length in words, all in one engine run;
        # mean LongBench-Write S_l, mean LonGen window score, repeated-13-gram rate and
        # per instruction the spread of output lengths (mean, std, p90). Prompts go
        # through the chat template when data.format is chat.
        length=dict(
            enabled=False,
            # JSONL, one {"instruction", "required_words"[, "kind": about|above|below]} a
            # line; "": the built-in set (every length of `words` asked about / at least /
            # at most, topics drawn from evals.seed).
            file="",
            words="50,100,200,400,800",  # the built-in set's required lengths in words
            samples=4,  # responses per instruction
            temperature=0.8,  # sampling, seeded by evals.seed
            # New tokens per response; 0: twice the longest requirement in the
            # tokenizer's tokens, at most what evals.context leaves after the prompt.
            max_new_tokens=0,
            slots=0,  # responses generated at once (engine slots); 0: all of them
        ),
    )
    # --config.mode=export: the latest checkpoint as a Hugging Face directory.
    c.export = dict(dir="", max_shard_gb=2.0)
    # --config.mode=serve: an OpenAI-compatible HTTP server (lcx.serve) on the workdir's
    # latest checkpoint, or on init.hf_checkpoint when the workdir has none.
    c.serve = dict(
        host="127.0.0.1",  # loopback only unless told otherwise ("0.0.0.0": every interface)
        port=8000,
        model_name="",  # the id clients name; "": the workdir's name
        max_context=0,  # prompt + max_tokens per request; 0: train.seq_len
        max_queue=64,  # requests waiting for a slot before new ones get 429
        api_key="",  # "": the LCX_API_KEY environment variable, else no key
        drain_seconds=30.0,  # on SIGTERM: how long in-flight requests may finish
        slots=8,  # sequences decoded at once
        token_budget=256,  # query tokens per engine step
    )
    # The serving engine of mode=generate and mode=serve (lcx.generate.Engine).
    c.engine = dict(
        page_size=0,  # > 0: a paged cache of pages this many tokens long; 0: one stretch a slot
        num_pages=0,  # the paged cache's pool; 0: slots x the longest sequence's pages
        prefix_cache=False,  # reuse cached full pages of earlier prompts (needs page_size)
        speculative="",  # "ngram": prompt lookup; "draft": a draft model; "": none
        speculative_k=4,  # drafts verified per sequence and step
        draft_checkpoint="",  # speculative="draft": a Hugging Face checkpoint directory
        admission="fcfs",  # "past_future": admit while predicted page use fits (page_size)
    )
    # Start from a Hugging Face checkpoint (lcx.checkpoints): its config.json sets the
    # architecture, config.model how it runs; rope_theta > 0 replaces its RoPE base.
    c.init = dict(hf_checkpoint="", rope_theta=0.0)

    c.data = dict(
        # Comma-separated files or directories; empty: the embedded corpus (Python's
        # standard library sources).
        paths="",
        eval_paths="",  # comma-separated eval files; empty: split off data.paths
        # A weighted mix instead of data.paths: ({"paths": ..., "weight": 0.6,
        # "min_tokens": 0}, ...); each source is split, packed on its own and its rows
        # drawn in proportion to its weight (grain's mix); documents shorter than
        # min_tokens are left out (and counted).
        sources=(),
        # text: every file a document. chat: JSONL conversations ({"messages": [...]} or
        # {"prompt", "completion"}) through the tokenizer's chat template, the loss on
        # assistant turns only (lcx.posttrain.sft).
        format="text",
        skip_bad_lines=False,  # chat: skip (and count) malformed lines instead of stopping
        keep_binary=False,  # train on files with NUL bytes too (skipped and counted if not)
        # bytes | checkpoint (init.hf_checkpoint's tokenizer.json) | a directory holding a
        # Hugging Face tokenizer.json. Special ids come from the tokenizer.
        tokenizer="bytes",
        add_bos=True,  # each document is [BOS] + its tokens + [EOS], added explicitly
        add_eos=True,
        # Files under each top-level directory joined into one (long) document.
        join_directories=False,
        packing="first_fit",  # a key of lcx.packing.REGISTRY
        eval_fraction=0.02,
        max_documents=0,  # 0: all
        cache=True,  # tokenized corpus cached as zarr in WORKDIR/cache
        # Document shards, each packed on its own; a process reads shards/processes of
        # them. 0: one per process. Fix it to keep the data order on another host count.
        shards=0,
        # Settings of the strategies that take them, under their names (docs/methods.md).
        first_fit=dict(num_bins=128),  # rows packed at once; 0: one per row (packs poorly)
        best_fit=dict(num_bins=128),
        # Dataset Decomposition: rows of 2^min_log2 .. 2^max_log2 tokens, batch_size *
        # seq_len tokens per step; curriculum uniform | grow_p2; cycles of short-to-long.
        dd=dict(min_log2=6, max_log2=8, curriculum="grow_p2", cycles=1),
    )
    c.train = dict(
        steps=600,
        batch_size=16,  # sequences per step, before any adaptive growth
        micro_batch_size=0,  # 0: the whole batch in one micro-step
        seq_len=256,
        max_tokens=0,  # > 0: stop once this many tokens were trained (before `steps`)
        log_every=10,
        eval_every=200,
        eval_batches=8,
        checkpoint_every=200,
        keep_checkpoints=2,
        async_checkpoints=True,
        progress=True,
        # Resume even though keys outside lcx.train.run_record.RESUMABLE changed.
        allow_config_change=False,
        # token: the loss is the mean over the global batch's target tokens (weighted:
        # sum(w * ce) / sum(w)); sequence: the mean over documents of each one's mean.
        loss_average="token",
    )
    c.optimizer = dict(
        name="adamw",  # a key of lcx.train.optimizer.OPTIMIZERS
        grad_clip=1.0,
        # Hyper-parameters of each optimizer, under its name (keyword arguments of its
        # factory: optax.adamw, lcx.optim.lamb, lcx.optim.adagrad, lcx.optim.adagrad_norm).
        adamw=dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
        lamb=dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
        adagrad=dict(initial_accumulator_value=0.1, eps=1e-8),
        adagrad_norm=dict(initial_accumulator_value=0.1),
    )
    # Learning rate as a function of tokens seen; lengths in steps of the first batch.
    c.schedule = dict(
        name="cosine",  # a key of lcx.train.optimizer.SCHEDULES: cosine | wsd | power
        peak_lr=2e-3,  # power: the cap max_lr. Tuned for `make train` (BENCHMARKS.md)
        warmup_steps=50,
        decay_steps=0,  # wsd, power: the final decay phase
        decay="linear",  # exponential | linear | 1-sqrt
        final_lr_fraction=0.1,
        power=dict(a=4.0, b=-0.51),  # lr = min(peak_lr, batch_size * a * tokens^b)
    )
    # AdAdaGrad: grow the batch (in micro-batches of train.micro_batch_size) when the
    # gradient noise dominates.
    c.batch = dict(
        adaptive=False,
        test="augmented_inner_product",  # norm | inner_product | augmented_inner_product
        eta=0.1,
        theta=0.1,
        nu=0.1,
        test_interval=10,
        max_batch_size=64,
        groups_per_micro_batch=4,
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
    # With mesh.sequence > 1 attention runs as a ring (lcx.attention.ring) over rows
    # permuted once in the input pipeline: balanced (per row, the layout of contiguous,
    # zigzag, striped or whole documents whose ring visits the fewest blocks), or one of
    # those always.
    c.ring = dict(layout="balanced")
    # --config.mode=recipe: stages run in order into WORKDIR/<k>-<name>, each starting
    # from the one before (configs/prolong_tiny.py): ({"name": "long", "config": {nested
    # overrides of this config}, "evaluate": True}, ...).
    c.recipe = dict(stages=())
    # --config.mode=self_lengthen (lcx.posttrain.self_lengthen; configs/self_lengthen_tiny.py):
    # rounds of the Generator writing `samples` responses per instruction, the Extender
    # lengthening them (`retries` tries to pass the filters: >= min_ratio x longer, a
    # finished last sentence, no repeated 13-gram), both fine-tuned on the results.
    c.self_lengthen = dict(
        instructions="",  # JSONL of {"instruction"[, "required_words"]}
        rounds=3,
        samples=2,
        retries=3,
        max_new_tokens=1024,
        temperature=0.8,
        slots=64,  # sequences generated at once
        min_ratio=1.2,
        keep=2 / 3,  # the share of the Extender's rewrite it continues from
        drop_lines=0.2,  # of the source, for the Extender's training prompt
        rank_drop=True,  # drop the shortest accepted with probability 1 - 2 rank^3
        seed=0,
        epochs=4.0,  # each fine-tune's passes over its round's samples; 0: finetune's steps
        # Each role's fine-tune: overrides of this config (data.format, paths and init
        # are set by the round), e.g. {"train": {"steps": 100}}.
        finetune={},
    )
    # Logical axis -> mesh axes: lcx.runtime.sharding.DEFAULT_RULES (batch over data and
    # fsdp; parameters FSDP-sharded on their model dimension, tensor-parallel on heads
    # and the MLP width).
    c.sharding_rules = DEFAULT_RULES
    c.model = dict(
        vocab_size=384,  # >= the tokenizer's vocabulary; 0: the tokenizer's, rounded up to 128
        d_model=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=768,
        rope_theta=10_000.0,
        norm_eps=1e-6,
        dtype="bfloat16",  # compute dtype: 1.4x faster on CPU than float32
        param_dtype="float32",  # parameter (and optimizer state) storage
        attention_implementation=config_dict.placeholder(str),
        attention_window=config_dict.placeholder(int),
        block_pattern=("attention",),  # cycled over layers: attention | lact (lcx.ttt)
        # LaCT layers (lcx.ttt.LaCTSettings): fast-weight heads, chunk, the window of their
        # attention, chunks counted from each document's start ("document") or the row's.
        lact=dict(
            fw_heads=2,
            chunk_size=2048,
            window=2048,
            inter_multi=1.0,
            momentum=True,
            muon=True,
            base_lr=1e-2,
            grid="document",
        ),
        remat="none",  # none | full | dots (keep matmul outputs) | offload (to host memory)
        scan_layers=False,  # blocks under lax.scan: compile time flat in depth
        # LoRA (lcx.lora): rank > 0 trains only low-rank adapters W + (alpha /
        # rank) A B beside the targeted kernels (attention q, k, v, o; SwiGLU gate, up,
        # down); the base (init.hf_checkpoint, else the seed's init) stays frozen and
        # outside the checkpoints; exports and generation fold the adapters in.
        lora=dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down")),
    )

    if smoke:
        c.data.max_documents = 40
        c.train.update(steps=4, batch_size=4, seq_len=64, log_every=1, eval_every=2, eval_batches=1)
        c.train.update(checkpoint_every=2, progress=False)
        c.schedule.warmup_steps = 1
        c.batch.max_batch_size = 16
        c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
        c.model.mlp_dim = 64
    return c
