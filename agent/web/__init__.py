"""efci web: the unprivileged page, a client of the agent's socket.

It runs as its own user with no capabilities, parses HTTP so the agent
never has to, and asks the agent for everything through the same
operations efci uses (agent.ops).
"""
