from sweepbp.report.command import main

raise SystemExit(main())
