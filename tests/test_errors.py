"""Every error a user can cause is a KronosError subclass, exported from `kronos` and `kronos.errors`."""

import inspect

import kronos
import kronos.errors as errors


def test_every_error_class_is_exported_from_kronos():
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.KronosError) and c.__module__ == errors.__name__
    ]
    assert {"KronosError", "ConfigError", "DataError", "CheckpointError", "InputError", "DependencyError"} <= {
        c.__name__ for c in classes
    }
    for c in classes:
        assert getattr(kronos, c.__name__) is c
        assert c.__name__ in kronos.__all__


def test_api_misuse_is_an_input_error():
    import numpy as np
    import pytest

    from kronos.inference.predictor import prob_up

    with pytest.raises(errors.InputError, match="samples, steps"):
        prob_up(np.zeros(3), 1.0)
