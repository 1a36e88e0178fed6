from tests.training.conftest import workspace  # noqa: F401  (shared session fixture)
