from moeforge.cli import main

main()
