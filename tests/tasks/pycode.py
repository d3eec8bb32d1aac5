"""The data of the task configs beside this file, for lm-evaluation-harness (`--include_path tests/tasks`).

The files are read from this folder, offline: a YAML `data_files` path would be resolved against the working
directory, and `datasets.load_dataset` may look for a script on the Hub first.
"""
import json
from pathlib import Path

import datasets


def load(data_file: str, **metadata) -> datasets.DatasetDict:
    """custom_dataset of a task config: its JSON Lines file as the test split (the harness passes the config's
    metadata too, unused here)."""
    lines = (Path(__file__).parent / data_file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
