from peoplebase.cli import main

main()
