"""Does SHD help? Train identical students under several losses and compare held-out perplexity.

    python -m pipeline.study                                     # 6 variants x 3 seeds, budget "small"
    python -m pipeline.study --variants kd,kd_shd,kd_mean --seeds 1,2,3,4,5
    python -m pipeline.study --teacher-heads 8,16 --student-heads 4   # where do the weights matter?
    python -m pipeline.study --seq-lens 128,512 --steps-list 150,600
    python -m pipeline.study --variants kd,kd_select,kd_shd --w-shd-list 0.1,0.3,1.0 --jobs 2 --nproc 1
    python -m pipeline.study --data DIR --tokenizer DIR --teacher HF_DIR --budget large \\
        --launcher "sbatch --wait launch/slurm/train.sbatch"      # one Slurm job per run, in turn
    python -m pipeline.study --dry-run                           # check the configs, print the plan

(``python bench/distill_compare.py ...`` still works: it forwards here.)

Every run goes through the normal entry point (``launch/local.sh CONFIG`` = ``python -m
pipeline.train``, ``NPROC`` processes under ZeRO-3), so what is measured is what users run. For
one setting the students share architecture, budget (tokens), schedule and evaluation batches;
seed k gives every variant the same initial weights and data order (``seed`` sets both), so the
differences are paired. ``launch/demo.sh`` is this command with ``--preset demo`` (3 variants, 1
seed, budget demo): one implementation.

Before the first stage runs, every teacher and student config of the plan is checked by the
engine's config validation (a misspelt ``--override`` key, or a bad value, stops the study with
a message naming the variant, the setting and the key); ``--dry-run`` checks them too.

Without ``--data``/``--teacher`` the demo's are used (``runs/demo/data``, ``runs/demo/teacher``),
made here if missing: the ``python-stdlib`` corpus, a SentencePiece tokenizer, shards, and a
teacher pre-trained with the engine's ``pretrain`` stage and exported. Every stage writes a
``DONE`` marker after it succeeds and is skipped when run again with the same configuration
(for the data: the same corpus, vocabulary and tokenizer recipe; for a teacher or student: the same
data and teacher content too, recorded in its ``inputs.json``, so a rebuilt corpus or re-trained
teacher re-runs everything downstream of it); an interrupted stage resumes from its newest
checkpoint (or starts over if it has none).

Outputs in ``--out`` (per setting in ``--out/<setting>`` when sweeping): ``results.json`` (all
numbers, curves included), ``results.md`` (table + paired differences), ``ppl.png`` (training
loss and held-out perplexity against tokens), TensorBoard logs under ``--out/tb``; a sweep also
writes ``--out/results.md`` with every setting and one table across settings (paired differences
against KD and ``select``).

Modules: ``variants`` (the variant table, budgets), ``plan`` (run configs, validation),
``inputs`` (the data and teacher content a run read), ``runner`` (stages, DONE markers,
launching), ``report`` (tables, plots), ``cli`` (command line).
"""
