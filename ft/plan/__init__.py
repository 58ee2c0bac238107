"""`llama-ft plan`: will this recipe fit my GPU, and how long will it take? Answered from the recipe and the
model's config alone, before any download, without importing torch.

Memory follows what the installed software actually keeps on the GPU, term by term (ft/plan/memory.py). Time is
the FLOPs per token of LoRA training (forward and the input-gradient half of the backward through the frozen base,
the small LoRA matmuls, attention, the LM head, plus one more forward with recomputation) divided by a realistic
fraction of the GPU's dense fp16/bf16 peak, taken from published measurements where there are some
(ft/plan/speed.py, ft/plan/hardware.py). Every published figure used is cited where it is used.

The modules, in the order the data flows:

* memory.py    `Shape`, `Step` and the bytes of every term of one step: pure arithmetic, no I/O
* speed.py     FLOPs per token and the fixed cost per micro-batch: pure arithmetic
* hardware.py  the GPUs plan knows, `parse_gpu`
* shapes.py    a model's `Shape`: built-in Llama 2, a local config.json or the Hub cache (reads files)
* datasize.py  rows and tokens of the training data (reads data files, the tokenizer, the datasets cache)
* phases.py    a stage's phases (sampling, scoring, training) from a `Context`; `STAGES`
* planner.py   `Plan` and planner.make: the peak phase, fits or not, hours and sessions
* advice.py    the smallest `--set` changes (or a bigger GPU) that make a recipe fit; `make`: the plan with them
* report.py    `render`, the text report
* check.py     `check_before_training`, the memory check before a stage loads its model (imports torch)
"""

from ft.plan.advice import advise, make, with_overrides
from ft.plan.check import MARGIN, check_before_training, resolve_batch_size
from ft.plan.datasize import (CHARS_PER_TOKEN, HUB_DATASETS, SAMPLE_ROWS, TURN_OVERHEAD, DataSize, data_size,
                              tokenizer_file)
from ft.plan.hardware import GPU, GPUS, parse_gpu
from ft.plan.memory import (ALL_TARGETS, ALLOCATOR_SLACK, CUDA_CONTEXT, FUSED_HEAD_TOKENS, NF4_DQ_BITS,
                            OPTIMIZER_BYTES, GiB, Shape, Step, backward_buffer_bytes, finish, kv_cache_bytes,
                            layer_bytes, step_terms, weight_bytes)
from ft.plan.phases import STAGES, Context, Phase, PhaseKind, schedule
from ft.plan.planner import Plan
from ft.plan.report import TERM_LABELS, render
from ft.plan.shapes import LLAMA2, model_shape, shape_from_config
from ft.plan.speed import LAUNCH_SECONDS, fixed_seconds, flops_per_token

__all__ = [
    "ALLOCATOR_SLACK", "ALL_TARGETS", "CHARS_PER_TOKEN", "CUDA_CONTEXT", "FUSED_HEAD_TOKENS", "GPU", "GPUS", "GiB",
    "HUB_DATASETS", "LAUNCH_SECONDS", "LLAMA2", "MARGIN", "NF4_DQ_BITS", "OPTIMIZER_BYTES", "SAMPLE_ROWS", "STAGES",
    "TERM_LABELS", "TURN_OVERHEAD", "Context", "DataSize", "Phase", "PhaseKind", "Plan", "Shape", "Step", "advise",
    "backward_buffer_bytes", "check_before_training", "data_size", "finish", "fixed_seconds", "flops_per_token",
    "kv_cache_bytes", "layer_bytes", "make", "model_shape", "parse_gpu", "render", "resolve_batch_size", "schedule",
    "shape_from_config",
    "step_terms", "tokenizer_file", "weight_bytes", "with_overrides",
]
