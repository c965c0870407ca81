"""The test bed's error."""


class TestbedError(RuntimeError):
    pass
