# bash completion for bitfog. Install: copy to
# /usr/share/bash-completion/completions/bitfog (or source it from ~/.bashrc).
_bitfog() {
    local cur prev cmd i
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    cmd=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            serve|builddb|emptydb|plan|fetch|store|status|keygen) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $prev in
        --conf) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --cache) COMPREPLY=($(compgen -d -- "$cur") $(compgen -W none -- "$cur")); return ;;
        --cacert|--encrypt-to-file|-i|--identity|-o|--output) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --addr|--threads|--max-bytes|--jobs|--max-delete|--signature-min|--token|--progress-interval|--exclude|--rsh|--remote-bitfog|--encrypt-to)
            return ;;
    esac
    local global="-q --quiet -h --help -V --version"
    local opts
    case $cmd in
        serve) opts="--conf --addr --threads --cache --stdio" ;;
        builddb) opts="--exclude --signatures --signature-min --encrypt-to --encrypt-to-file --progress-interval -v --verbose --json --token --cacert --rsh --remote-bitfog" ;;
        emptydb) opts="--encrypt-to --encrypt-to-file --json" ;;
        keygen) opts="-o --output" ;;
        plan) opts="--exclude --max-bytes -i --identity -v --verbose --json --token --cacert --rsh --remote-bitfog" ;;
        fetch) opts="--exclude --max-bytes --jobs --dry-run --encrypt-to --encrypt-to-file -i --identity --progress-interval -v --verbose --json --token --cacert --rsh --remote-bitfog" ;;
        status) opts="--verify -i --identity --json" ;;
        store) opts="--delete --max-delete --other-dest --jobs --dry-run --encrypt-to --encrypt-to-file -i --identity --progress-interval -v --verbose --json --token --cacert --rsh --remote-bitfog" ;;
        *)
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "$global" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "serve builddb emptydb plan fetch store status keygen" -- "$cur"))
            fi
            return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts $global" -- "$cur"))
    else
        # DB, DESTDB, SRCDB and COURIER are files and directories.
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -o filenames -F _bitfog bitfog
