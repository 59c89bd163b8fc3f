import sys

from ellm_mkd.commands.main import main

sys.exit(main())
