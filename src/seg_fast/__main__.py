from seg_fast.cli import main

raise SystemExit(main())
