"""Built-in agents: random, scripted, human and LLM agents."""
