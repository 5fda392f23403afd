"""Online serving and the control plane on Ray: the OpenAI-compatible Serve app, telemetry, policy, controller."""
