from vla_stack.cli import main

main()
