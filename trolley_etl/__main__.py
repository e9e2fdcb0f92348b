from trolley_etl.cli import main

raise SystemExit(main())
