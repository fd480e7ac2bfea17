from sweepbp.report.tables import main

raise SystemExit(main())
