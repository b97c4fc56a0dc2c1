"""Fault injection: rules that make the controller fail on purpose, reproducibly."""
from .engine import FaultEngine, Injection, replay_rules
from .rules import ACTIONS, KINDS, WHEN_KEYS, Rule, RuleError, parse_rule, parse_rules

__all__ = ["ACTIONS", "KINDS", "WHEN_KEYS", "FaultEngine", "Injection", "Rule", "RuleError",
           "parse_rule", "parse_rules", "replay_rules"]
