"""`python -m router --verifier NAME=HOST:PORT ...`: the router alone (see router/serve.py)."""

import sys

from router.serve import router_main

if __name__ == "__main__":
    sys.exit(router_main())
