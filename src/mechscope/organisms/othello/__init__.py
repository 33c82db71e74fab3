"""Othello-GPT (Li et al. 2023; Nanda 2023): a fast game engine, a small transformer that learns legal
moves, and its board read by linear probes."""

from mechscope.organisms.othello.engine import Games, Replay, legal, random_games, replay, squares, start, token_of

__all__ = ["Games", "Replay", "legal", "random_games", "replay", "squares", "start", "token_of"]
