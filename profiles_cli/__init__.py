"""The `profiles` command line: starts, stops and inspects the suite (`up`, `serve`, `status`...),
creates projects and keys, imports events and runs the demo. It sits above every service; the
contract it speaks (`profiles.<pkg>.v1`, `profiles.client`) stays in `profiles/`."""
