"""Identities (users, modules, cores), their tokens and scopes, and the HELLO checks."""
