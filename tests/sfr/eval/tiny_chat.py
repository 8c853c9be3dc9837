"""Two chat prompts shared by the evaluation tests that run the tiny LM (the ``tiny`` fixture: conftest.py)."""

MESSAGES = [[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is for dinner?"}],
            [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "How are you?"}]]
