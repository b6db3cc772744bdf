from mnist_ann.cli import main

main()
