"""A module with a job callable for every name (PEP 562), for tests that
send thousands of distinct callables that really exist."""


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)

    def job(*args):
        return name

    job.__name__ = name
    return job
