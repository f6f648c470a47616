from levo_eval.cli import main

raise SystemExit(main())
