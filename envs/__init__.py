"""Built-in environments; importing this package registers them."""

from areal_agents.registration import register

register("Countdown-v0", "areal_agents.envs.countdown:Countdown", difficulty="medium")
register("Arithmetic-v0", "areal_agents.envs.arithmetic:Arithmetic", digits=2, operations="+-*")
register("GuessNumber-v0", "areal_agents.envs.guess_number:GuessNumber", low=1, high=100)
register("Calculator-v0", "areal_agents.envs.calculator:Calculator", digits=4, terms=3)
register(
    "Signaling-v0", "areal_agents.envs.signaling:Signaling", num_items=4, message_length=1, rounds=1
)
register("TicTacToe-v0", "areal_agents.envs.tictactoe:TicTacToe", illegal="penalty")
register("PrisonersDilemma-v0", "areal_agents.envs.prisoners_dilemma:PrisonersDilemma", rounds=5)
register("Negotiation-v0", "areal_agents.envs.negotiation:Negotiation", num_types=3, max_turns=6)
register(
    "SolverJudge-v0", "areal_agents.envs.solver_judge:SolverJudge", task="arithmetic", digits=2
)
register(
    "Dataset-v0", "areal_agents.envs.dataset:DatasetEnv", max_turns=1,
    description="Question-answer tasks from a data file (path=...), one answer scored by a verifier",
)  # fmt: skip
register(
    "DatasetMultiTurn-v0", "areal_agents.envs.dataset:DatasetEnv", max_turns=3,
    description="Dataset-v0 with up to max_turns answers, the verifier's reason as feedback",
)  # fmt: skip
