"""Every name a WaveFT file spells and every default the paper fixes, typed once (docs/FORMAT.md is the
contract). Metadata keys are `META_*`, per-layer tensor-name suffixes `SUFFIX_*`, defaults `DEFAULT_*`.
Code reads these names; tests spell the strings themselves, as an independent check of the contract."""

from __future__ import annotations

# ---- metadata keys written by this project (FORMAT.md 3.1 and its extensions)
META_FORMAT_VERSION = "waveft.format_version"
META_WAVELET = "waveft.wavelet"  # extension 1: mirrors of the per-layer settings, for readers of metadata only
META_SCALING = "waveft.scaling"
META_USE_IDWT = "waveft.use_idwt"
MIRROR_KEYS = (META_WAVELET, META_SCALING, META_USE_IDWT)
META_SEED = "waveft.seed"
META_TRAINING = "waveft.training"
META_SOURCE = "waveft.source"
META_IMPORT_NOTES = "waveft.import_notes"

# ---- metadata keys other tools read (kohya sd-scripts' ss_*, Stability's modelspec.*, model managers' hashes)
META_BASE_MODEL = "ss_base_model_version"
META_NETWORK_MODULE = "ss_network_module"
META_NETWORK_ARGS = "ss_network_args"
META_TAG_FREQUENCY = "ss_tag_frequency"
META_ARCHITECTURE = "modelspec.architecture"
META_TITLE = "modelspec.title"
META_DESCRIPTION = "modelspec.description"
META_TRIGGER_PHRASE = "modelspec.trigger_phrase"
META_DATE = "modelspec.date"
META_SPEC_VERSION = "modelspec.sai_model_spec"
META_DATASETS = "ss_datasets"
META_NETWORK_DIM = "ss_network_dim"
META_NETWORK_ALPHA = "ss_network_alpha"
SPEC_PREFIX = "modelspec."  # every model-spec key
KOHYA_PREFIX = "ss_"  # every kohya sd-scripts key
SPEC_VERSION = "1.0.0"  # the model spec version written
NETWORK_MODULE = "waveft"  # ss_network_module of a native WaveFT file
META_MODEL_HASH = "sshs_model_hash"  # the content hashes (files/metadata.py says how each is computed)
META_LEGACY_HASH = "sshs_legacy_hash"
META_SPEC_HASH = "modelspec.hash_sha256"
HASH_KEYS = (META_MODEL_HASH, META_LEGACY_HASH, META_SPEC_HASH)

# ---- per-layer tensor names: "<layer>.<suffix>"
SUFFIX_SPECTRUM = "waveft_spectrum"
SUFFIX_INDICES = "waveft_indices"
SUFFIX_SHAPE = "waveft_shape"
SUFFIX_SCALING = "waveft_scaling"
SUFFIX_WAVELET = "waveft_wavelet"  # format 2: per-layer settings
SUFFIX_USE_IDWT = "waveft_use_idwt"
NATIVE_SUFFIXES = (SUFFIX_SPECTRUM, SUFFIX_INDICES, SUFFIX_SHAPE, SUFFIX_SCALING, SUFFIX_WAVELET, SUFFIX_USE_IDWT)
SUFFIX_STOCK_LAYOUT = "waveft_layout"  # extension 4: a file the stock Train LoRA node saved with algorithm WaveFT
SUFFIX_KOHYA_SEED = "waveft_random_loc_seed"  # lora-scripts-next's networks.waveft_anima
SUFFIX_KOHYA_FAMILY = "waveft_family_code"
KOHYA_ONLY_SUFFIXES = (SUFFIX_KOHYA_SEED, SUFFIX_KOHYA_FAMILY)  # tell a kohya-style WaveFT file from the others
KOHYA_ARG_SEED = SUFFIX_KOHYA_SEED  # their ss_network_args spell the seed as the tensor does
KOHYA_SUFFIXES = (
    SUFFIX_SPECTRUM,
    SUFFIX_INDICES,
    SUFFIX_SCALING,
    SUFFIX_KOHYA_SEED,
    SUFFIX_USE_IDWT,
    SUFFIX_KOHYA_FAMILY,
)
OPTIMIZER_STATE_PREFIX = "waveft_train."  # extension 2: optimizer state in training checkpoints

# ---- PEFT's files (adapter_config.json and the tensors beside it)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

# ---- the paper's and PEFT's defaults (Bilican et al., SDXL DreamBooth)
DEFAULT_WAVELET = "db1"
DEFAULT_SCALING = 25.0
DEFAULT_SEED = 777  # PEFT's random_loc_seed
DEFAULT_USE_IDWT = True
DEFAULT_COEFFICIENTS = 2592  # per layer: about a rank-1 LoRA's parameter count on SDXL
DEFAULT_LEARNING_RATE = 1e-4  # with DEFAULT_SCALING
PEFT_DEFAULTS = {
    "wavelet_family": DEFAULT_WAVELET,
    "scaling": DEFAULT_SCALING,
    "random_loc_seed": DEFAULT_SEED,
    "use_idwt": DEFAULT_USE_IDWT,
}
