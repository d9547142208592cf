"""The PettingZoo ``ParallelEnv`` adapter (pettingzoo is an optional dependency)."""

from __future__ import annotations

from typing import Any

try:
    from pettingzoo import ParallelEnv
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "to_pettingzoo needs pettingzoo: pip install 'areal-agents[dev]' (or pettingzoo>=1.24)"
    ) from exc

from gymnasium import spaces

from .adapters import MAX_ACTION_CHARS, MAX_OBS_CHARS, _Loop, decode_action, render_obs, text_space
from .env import MultiAgentEnv

NO_MESSAGES = render_obs([])


class PettingZooAdapter(ParallelEnv):
    """A ``MultiAgentEnv`` as a synchronous ``pettingzoo.ParallelEnv`` (see ``to_pettingzoo``)."""

    def __init__(self, env: MultiAgentEnv) -> None:
        if not isinstance(env, MultiAgentEnv):
            raise TypeError(
                f"to_pettingzoo takes a MultiAgentEnv, got {type(env).__name__}; "
                "use to_gymnasium for an AgentEnv"
            )
        self.env = env
        self.possible_agents = list(env.possible_agents)
        self.agents: list[str] = []
        self.metadata = {"render_modes": [], "name": type(env.unwrapped).__name__, **env.metadata}
        self.render_mode = env.render_mode
        self._obs_spaces = {a: text_space(MAX_OBS_CHARS) for a in self.possible_agents}
        self._act_spaces = {a: text_space(MAX_ACTION_CHARS) for a in self.possible_agents}
        self._acting: set[str] = set()
        self._runner = _Loop()
        self._closed = False

    def observation_space(self, agent: str) -> spaces.Space:
        return self._obs_spaces[agent]

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_spaces[agent]

    def _views(self, obs: dict[str, Any], infos: dict[str, Any]) -> tuple[dict, dict]:
        self._acting = set(obs)
        self.agents = list(self.env.agents)
        out_obs = {a: render_obs(obs[a]) if a in obs else NO_MESSAGES for a in self.agents}
        out_infos = {a: {**infos.get(a, {}), "acting": a in obs} for a in self.agents}
        return out_obs, out_infos

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, infos = self._runner.run(self.env.reset(seed=seed, options=options))
        return self._views(obs, infos)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        before = list(self.agents)
        chosen = {a: decode_action(x) for a, x in actions.items() if a in self._acting}
        obs, rewards, _terms, truncs, infos = self._runner.run(self.env.step(chosen))
        out_obs, out_infos = self._views(obs, infos)
        everyone = list(dict.fromkeys([*before, *self.agents]))
        gone = set(before) - set(self.agents)
        out_rewards = {a: float(rewards.get(a, 0.0)) for a in everyone}
        out_truncs = {a: bool(truncs.get(a, False)) and a in gone for a in everyone}
        out_terms = {a: a in gone and not out_truncs[a] for a in everyone}
        for a in gone:  # PettingZoo gives finished agents a last observation and info
            out_obs[a] = render_obs(obs[a]) if a in obs else NO_MESSAGES
            out_infos[a] = {**infos.get(a, {}), "acting": False}
        return out_obs, out_rewards, out_terms, out_truncs, out_infos

    def render(self) -> Any:
        return self.env.render()

    def state(self) -> Any:
        raise NotImplementedError("text envs have no global state array")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._runner.run(self.env.close())
        self._runner.close()
