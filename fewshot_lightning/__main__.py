import sys

from .cli import main

# argparse names the program after argv[0]: the usage line and the hints then say
# "fewshot-lightning", as under the console script, not "__main__.py".
sys.argv[0] = "fewshot-lightning"
main()
