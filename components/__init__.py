"""KFP v2 components, one per pipeline stage: thin wrappers over the alignprop library.

Each is a lightweight Python component: its body imports alignprop (installed in the project image, `base_image`)
and calls one library function; nothing is pip-installed at run time (`install_kfp_package=False`), so
`kfp.local.SubprocessRunner(use_venv=False)` runs them in the current environment. GPUs, volumes, secrets and
retries are set by the pipelines (pipelines/cluster.py), never here.
"""

IMAGE = "alignprop:0.1.0"  # the default; pipelines set the image they are compiled for (set_container_image)

from components.cache import cache_models  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.prompts import prepare_prompts  # noqa: E402
from components.register import register_model, select_best  # noqa: E402
from components.train import train_alignprop, train_ddpo  # noqa: E402
from components.validate import make_trials, validate_inputs  # noqa: E402

__all__ = ["IMAGE", "cache_models", "evaluate", "make_trials", "prepare_prompts", "register_model", "select_best",
           "train_alignprop", "train_ddpo", "validate_inputs"]
