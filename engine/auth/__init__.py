"""Who may connect and what they may do: JWT verification, topic permissions,
origin checks, rate limits. PURE: every module here takes the time and the
environment as arguments; the worker (workers/) does the I/O."""
