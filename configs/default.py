"""I-JEPA pretraining configs.

Usage: `python train.py --config=configs/default.py:PRESET --workdir=DIR`, with overrides such as
`--config.model.attention=xla --config.total_steps=100 --config.batch_size=256`.

Presets (the table is jepa_jax/presets.py): tiny (seconds per step on a laptop CPU), digits
(minutes on a laptop CPU, then beats random init: README, Did pretraining work?), vit_b16,
vit_l16, and the released recipes vit_h14 (IN-1K), vit_h16_448 (IN-1K, 448 px), vit_h14_in22k
and vit_g16 (IN-22K). Values follow the official release's code (see IJEPA_REFERENCE.md); where
the paper text differs, the code wins.
"""

import ml_collections

from jepa_jax.presets import MODELS, PRESETS


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(PRESETS)}")
    recipe = PRESETS[arg]
    model = MODELS[recipe.model]
    tiny = arg == "tiny"
    small = arg in ("tiny", "digits")  # the CPU presets: small images, in-process data
    steps_per_epoch = recipe.dataset_images // recipe.batch_size

    c = ml_collections.ConfigDict()
    c.preset = arg  # informational: which preset these values came from
    c.seed = 0  # seeds parameters, data order, crops and masks
    c.batch_size = recipe.batch_size  # GLOBAL batch over all devices and hosts
    # Optimizer steps of the run: the recipe's epochs over its dataset (ImageNet-1K or -22K).
    c.total_steps = recipe.epochs * steps_per_epoch if not tiny else 30
    c.log_every = 10 if tiny else 100  # steps between metric fetches (stdout + metrics.jsonl)
    # Steps between checkpoints in WORKDIR/checkpoints (0: only at the end). SIGTERM/SIGINT also
    # save; rerunning the same command resumes exactly from the latest one.
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # how many recent checkpoints to keep (>= 1)
    # A step whose loss or gradient norm is not finite is skipped (nothing changes) and counted.
    # stop: end the run, saving nothing new, once max_nonfinite_steps in a row were skipped
    # (checked when logging or saving); skip: go on.
    c.on_nan = "stop"
    c.max_nonfinite_steps = 3

    c.model = ml_collections.ConfigDict()
    c.model.variant = model.size  # encoder size: tiny, small, base, large, huge, giant
    c.model.depth = -1  # encoder blocks (-1: the variant's own, 12 for tiny ... 40 for giant)
    c.model.patch_size = model.patch_size  # pixels per patch side; image_size must be a multiple
    c.model.image_size = 96 if small else model.image_size  # square crop side in pixels
    c.model.pred_depth = 2 if small else model.pred_depth  # predictor blocks (6 B, 12 L/H, 16 G)
    c.model.pred_dim = 192 if small else 384  # predictor width (384 in every released model)
    # auto | cudnn | xla | reference. auto: cuDNN flash attention on a supported GPU, otherwise
    # the fastest correct path here. Parameters never depend on this choice.
    c.model.attention = "auto"
    # auto | on | off. auto: on Hopper GPUs (bf16), the q/k/v projection writes q, k and v apart
    # from inside its matmul (a Pallas kernel, jepa_jax.kernels.dense), so no copy unstacks
    # them; XLA elsewhere. On a mesh each device runs it (and the two kernels below) on its rows.
    # Parameters never depend on this choice.
    c.model.fused_qkv = "auto"
    # auto | on | off. With cuDNN attention on GPUs, the backward of sequences of at most 128
    # tokens (the context encoder's and the predictor's) runs in a Pallas kernel
    # (jepa_jax.kernels.short_attention): alone on an H200 it ran 1.4x faster than cuDNN's
    # backward; whole steps ran 3-4% faster at ViT-B/16 and 1.5% at ViT-H/14, with 0.35 and
    # 1.25 GiB less peak memory (BENCHMARKS.md).
    c.model.short_attention_backward = "auto"
    # auto | on | off. auto: on CUDA GPUs, the MLPs' exact GELU forward runs in a Pallas
    # kernel (jepa_jax.kernels.gelu): 31-32% less time than XLA's fusion alone on an H200, whole
    # steps about 1.5% faster (BENCHMARKS.md). Outputs agree to bf16's rounding.
    c.model.gelu_kernel = "auto"
    # exact | tanh. exact: the erf GELU the release trained with. tanh: its tanh approximation,
    # which XLA computes inside fc1's cuBLAS GEMM on a GPU (no GELU pass over memory): on an
    # H200 steps ran about 3% faster; each GELU output within bf16's rounding of the exact one
    # for inputs above -2, and at most 5e-4 away anywhere (BENCHMARKS.md). A faster, less faithful
    # option; gelu_kernel=on refuses it (the kernel computes the exact GELU).
    c.model.gelu = "exact"
    # off | target. target: the EMA target encoder's block matmuls multiply e4m3 operands, the
    # activations scaled by bounds derived from the parameters (jepa_jax.models.fp8): FP8 GEMMs
    # on Hopper and later, the same rounding emulated elsewhere. On an H200 steps ran 9-11%
    # faster at ViT-H/14 and 2% at ViT-B/16; the targets carry about 10x bf16's rounding error
    # (BENCHMARKS.md: loss curves). The parameters' layout and checkpoints do not change.
    c.model.fp8 = "off"
    # Precision as the release's bf16 autocast: matmuls and attention take `dtype` inputs (float32
    # accumulation); the residual stream, LayerNorms, encoder output and targets use
    # `residual_dtype`. Parameters are always float32. residual_dtype=bfloat16 is a faster, less
    # faithful option (README: Precision).
    c.model.dtype = "bfloat16"  # bfloat16 | float16 | float32
    c.model.residual_dtype = "float32"  # float32 (the release) | bfloat16 | float16
    c.model.remat = False  # recompute block activations in the backward pass to save memory
    # Run the blocks as one scanned loop: compiles ~2.5x faster, but steps run 1.2-1.3x slower
    # on an H100 (BENCHMARKS.md). Off: the layers are unrolled.
    c.model.scan_layers = tiny  # tiny: CPU tests and quick starts, where compile time dominates

    c.mask = ml_collections.ConfigDict()
    c.mask.num_targets = 4  # target blocks per image
    c.mask.target_scale = (0.15, 0.2)  # target block area, fraction of the patch grid
    c.mask.target_aspect = (0.75, 1.5)  # target block height / width
    c.mask.context_scale = (0.85, 1.0)  # context block area before targets are removed
    c.mask.min_keep = 4 if small else 10  # fewest context tokens an image may keep
    # Context tokens per image, fixed so the step compiles once; -1 derives it from the grid and
    # scales (the length upstream's per-batch trimming gives on average).
    c.mask.num_context_tokens = -1
    # The release's per-GPU batch (128 for the 224-px IN-1K recipes, 32 for IN-22K H/14, 16 for
    # H/16-448 and G/16): it trims masks to the minimum over that many images, which -1 above
    # reproduces on average.
    c.mask.trim_batch = recipe.trim_batch

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"  # builtin (procedural images, no download) | digits | folder
    c.data.path = ""  # image folder (root/class/*.JPEG or flat) when source=folder
    c.data.num_workers = 0 if small else 8  # grain worker processes per host (0: in-process)
    c.data.crop_scale = (0.3, 1.0)  # RandomResizedCrop area range
    c.data.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    c.data.builtin_size = 1024  # number of distinct procedural images in the builtin source
    # A file that cannot be decoded (empty, truncated, not an image, decompression bomb): skip
    # trains on the next readable image instead (same batches for any worker count, counted in
    # each batch's `bad_images`, first few named in the log) | stop: raise naming the file.
    c.data.on_bad_image = "skip"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate after warmup
    c.optim.start_lr = 2e-4  # learning rate at step 0
    c.optim.final_lr = 1e-6  # learning rate at the last step (cosine)
    c.optim.warmup_steps = recipe.warmup_epochs * steps_per_epoch if not tiny else 5
    c.optim.weight_decay = (0.04, 0.4)  # cosine from first to second over the run
    c.optim.ema = (0.996, 1.0)  # target-encoder momentum, linear over the run
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    # k-NN evaluation of the target encoder during training (python -m jepa_jax.evaluate is the
    # full linear probe + k-NN): labelled folders root/<class>/<images> with the same classes,
    # or "builtin" (README: Did pretraining work?).
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # steps between evaluations (0: off)
    c.eval.train_data = ""  # the k-NN memory bank
    c.eval.val_data = ""  # the images scored
    c.eval.features = "avgpool"  # avgpool (mean of the output tokens) | last4 (last 4 blocks)
    c.eval.batch_size = 256  # global extraction batch (rounded up to a multiple of the devices)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1: all devices left over)
    c.mesh.fsdp = 1  # parameter-sharding axis size

    # Metrics also go to Weights & Biases when a project is named here and `wandb` is installed
    # (otherwise the run says so and goes on); TensorBoard files are always written.
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""  # W&B project ("": off); the run is named after the workdir

    if arg == "digits":
        # Chosen by a sweep on one H100 (BENCHMARKS.md, issue 14): 4 blocks learn as much in
        # 1,500 steps as 12 do, at 0.175 instead of 0.35 s a step on 2 CPU cores.
        c.model.depth = 4
        c.model.dtype = "float32"  # CPUs without bf16 matmuls: 0.22 vs 0.26 s a step
        c.model.scan_layers = False  # 4 blocks compile fast unrolled, and step faster
        c.data.source = "digits"
        c.optim.lr, c.optim.start_lr = 3e-4, 3e-5  # the default 1e-3 falls below random init
        c.log_every = 100
    return c
