"""ASHA whose rungs survive a driver restart.

Tune saves the search algorithm's state with the experiment, but not the scheduler's: a
resumed experiment would start ASHA with empty rungs, so trials after the restart would be
compared with nothing. :class:`PersistentASHA` writes its state (``ASHAScheduler.save``'s
``__dict__``) atomically after every change and loads it before first use.
"""
from __future__ import annotations

import json
import os
import pickle

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

STOPPED_FILE = "asha_stopped.json"  # trial ids ASHA stopped early, read by the trials themselves


class PersistentASHA(ASHAScheduler):
    """``ASHAScheduler(**kwargs)`` plus a state file.

    Args:
        state_path: where the rungs are kept (e.g. ``DIR/asha_state.pkl``).
        kwargs: ASHAScheduler's arguments (time_attr, max_t, grace_period, reduction_factor, ...).
    """

    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path = str(state_path)
        self._loaded = False
        self._stopped: list[str] = []

    def _load(self) -> None:
        if self._loaded:
            return
        if os.path.isfile(self._state_path):
            with open(self._state_path, "rb") as f:
                saved = pickle.load(f)
            saved.pop("_state_path", None)
            self.__dict__.update(saved)
        self._loaded = True

    def _save(self) -> None:
        from medattn.fileio import atomic_file

        with atomic_file(self._state_path) as f:
            pickle.dump(self.__dict__, f)

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        if trial.trial_id not in self._trial_info:  # a trial the saved state never saw
            super().on_trial_add(tune_controller, trial)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t \
                and trial.trial_id not in self._stopped:
            self._stopped.append(trial.trial_id)
            self._save_stopped()
        self._save()
        return action

    def _save_stopped(self) -> None:
        # Written before Tune stops the trial's actor, so the trial's cleanup can tell an early
        # stop (final) from an interrupted experiment (resumed later).
        path = os.path.join(os.path.dirname(self._state_path), STOPPED_FILE)
        from medattn.fileio import write_text

        write_text(path, json.dumps(self._stopped))

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._load()
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)
        self._save()

    @property
    def num_stopped(self) -> int:
        self._load()
        return self._num_stopped
