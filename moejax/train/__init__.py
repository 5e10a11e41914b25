"""Training: state, optimizer, jitted steps, the loop, checkpoints, writers.

    from moejax import train
    summary = train.train_and_evaluate(config, workdir)   # resumes if it can
    model = train.load_model(workdir)   # the trained model, on these devices

No flags here: experiments/train.py parses them and passes a ConfigDict.
See docs/training.md.
"""

from moejax.train.checkpoint import Checkpointer
from moejax.train.checkpoint import CorruptCheckpointError
from moejax.train.config import base_config
from moejax.train.config import parse_arg
from moejax.train.config import sweep_flags
from moejax.train.checkpoint import save_config
from moejax.train.errors import CheckpointRestoreError
from moejax.train.errors import CheckpointSaveError
from moejax.train.errors import ConfigError
from moejax.train.errors import DatasetError
from moejax.train.errors import ResumeConfigError
from moejax.train.errors import TrainingDivergedError
from moejax.train.errors import TrainingError
from moejax.train.errors import TrainingPreempted
from moejax.train.errors import WorkdirLockedError
from moejax.train.errors import WorkdirWriteError
from moejax.train.export import export_params
from moejax.train.export import load_model
from moejax.train.loop import format_summary
from moejax.train.loop import make_datasets
from moejax.train.loop import model_factory
from moejax.train.loop import train_and_evaluate
from moejax.train.loop import validate_config
from moejax.train.optim import make_optimizer
from moejax.train.optim import make_schedule
from moejax.train.state import TrainState
from moejax.train.state import create_train_state
from moejax.train.state import make_train_mesh
from moejax.train.state import tree_equal
from moejax.train.step import ClassificationTask
from moejax.train.step import LMTask
from moejax.train.step import compute_loss
from moejax.train.step import evaluate
from moejax.train.step import make_eval_step
from moejax.train.step import make_train_step
from moejax.train.step import masked_cross_entropy
from moejax.train.writers import read_scalars
from moejax.train.writers import JsonlWriter
from moejax.train.writers import ProgressBar
from moejax.train.writers import TensorBoardWriter
from moejax.train.writers import read_jsonl
