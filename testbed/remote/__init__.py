"""Real devices over SSH (paramiko): inventory, facts, deployment, agents, link shaping."""
